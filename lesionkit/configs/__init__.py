"""The recipes that ship with lesionkit: one YAML file per method and dataset (``<method>_<dataset>.yaml``).

``lesionkit configs`` lists them; ``lesionkit train --config NAME`` takes a recipe name as well as
a path. Each file's first comment line says what it trains.
"""

from __future__ import annotations

from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent


def list_recipes() -> list[str]:
    """Names of the shipped recipes, sorted."""
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """The YAML file of the shipped recipe ``name`` (with or without ``.yaml``)."""
    stem = name[:-5] if name.endswith(".yaml") else name
    path = RECIPES_DIR / f"{stem}.yaml"
    if "/" in stem or "\\" in stem or not path.is_file():
        raise FileNotFoundError(f"no recipe named {name!r}; shipped recipes: {', '.join(list_recipes())} "
                                "(or give the path of a YAML file)")
    return path


def resolve_recipe(source: str | Path) -> Path:
    """``source`` as a file: an existing path wins, then a shipped recipe of that name
    (``segmae_isic2018``, ``segmae_isic2018.yaml`` or the former ``configs/segmae_isic2018.yaml``)."""
    path = Path(source)
    if path.is_file():
        return path
    if path.parent in (Path("."), Path("configs")):
        stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
        if (RECIPES_DIR / f"{stem}.yaml").is_file():
            return RECIPES_DIR / f"{stem}.yaml"
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        raise FileNotFoundError(f"config file {str(path)!r} does not exist, nor is it a shipped recipe "
                                "(`lesionkit configs` lists them)")
    return recipe_path(str(source))


def recipe_summary(name: str) -> str:
    """The first comment line of a recipe, without the ``#``."""
    for line in recipe_path(name).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


__all__ = ["RECIPES_DIR", "list_recipes", "recipe_path", "recipe_summary", "resolve_recipe"]
