"""``python -m lesionkit.kernels``: print what was built and what each op runs on."""

from lesionkit.kernels.info import format_info

print(format_info())
