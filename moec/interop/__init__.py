"""Hugging Face interop: import a model directory as a spec + weights, export a spec + weights back.

Needs ``safetensors`` (the ``[hf]`` extra); ``transformers`` is not needed to import or
export (config.json is read and written as JSON), only to run the result with HF.
"""

from moec.interop.errors import UnsupportedConfig
from moec.interop.weights import load_weights, save_weights

__all__ = ["UnsupportedConfig", "export_hf", "import_hf", "load_weights", "save_weights"]


def import_hf(directory, spec_path, **kwargs):
    from moec.interop.hf_import import import_hf as run

    return run(directory, spec_path, **kwargs)


def export_hf(spec, weights, directory, **kwargs):
    from moec.interop.hf_export import export_hf as run

    return run(spec, weights, directory, **kwargs)
