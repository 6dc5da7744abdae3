"""prefgen-kedro: PrefGen (arXiv 2512.06020) as a Kedro project."""

__version__ = "0.1.0"
