"""ssb: Semantic Soft Bootstrapping (Mitra & Ulukus, arXiv 2512.05105) as a fast, frugal pipeline.

The Python API (:mod:`ssb.run.api`), loaded on first use so that ``import ssb`` stays light::

    cfg = ssb.load_config("toy", overrides=["run_dir=runs/api"])
    ssb.run_stage("rollout", cfg)
    ssb.run_pipeline(cfg)
"""

__version__ = "0.1.0"

_API = ("SSBConfig", "load_config", "run_pipeline", "run_stage", "stage_names")
__all__ = ["__version__", *_API]


def __getattr__(name: str):  # PEP 562: the API's functions, imported when first asked for
    if name in _API:
        from ssb.run import api

        return getattr(api, name)
    raise AttributeError(f"module 'ssb' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
