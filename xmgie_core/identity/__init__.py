"""Identity: face embeddings e_id = E_id(X), the identity preservation score IPS = cos(E_id(X_edit), E_id(X_src))
([xMGIE] §3.5, §4.2), face masks, and the recognizer backends."""
