"""Where to edit: the learnable-regions paper's learned region predictor (eqs 1-11) and zero-shot region modes."""
