"""Method trainers: each a small delta on the generic :class:`~lesionkit.engine.trainer.Trainer`.

One module per method, with its recipe config (a :class:`~lesionkit.engine.config.TrainConfig`
subclass) beside its trainer: ``segmae``, ``cmssm``, ``mae`` (GRCSF's MAE), ``grcsf`` (with
``residual_maps``, the MAE residual-map cache it reads) and ``amlp``. The registry
(:data:`lesionkit.engine.registry.TRAINER_MODULES`) imports a module when a config names its
trainer, so importing this package loads none of them.
"""
