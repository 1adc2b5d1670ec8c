"""Issue 15's axis of latent skill knowledge: the study on bases that hold the skills' operations
in different shares of their corpus (DVC stage ``levels``, scored by ``level_score``; the report draws the curve)."""
