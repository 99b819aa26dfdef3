"""Model runner side: persistent input batch, KV-cache sizing, per-step sampling metadata."""
