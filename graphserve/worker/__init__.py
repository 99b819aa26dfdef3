"""Model runner side: per-request state and the per-step input batch, KV-cache sizing, per-step sampling metadata."""
