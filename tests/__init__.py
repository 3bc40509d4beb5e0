"""The pytest suite (a package, so that a site-packages `tests` of some dependency never shadows it)."""
