"""ssb: Semantic Soft Bootstrapping (Mitra & Ulukus, arXiv 2512.05105) as a fast, frugal pipeline."""

__version__ = "0.1.0"
