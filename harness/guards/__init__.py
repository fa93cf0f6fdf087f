"""Guard classifiers shared by judges and defenses (a defense never imports a judge, so what both
need lives here, below both)."""
