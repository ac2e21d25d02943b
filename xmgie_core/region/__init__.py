"""Where to edit: seed 002's learned region predictor (eqs 1-11) and zero-shot region modes."""
