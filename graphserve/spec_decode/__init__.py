"""Speculative decoding (in progress): proposers of draft tokens — n-gram prompt lookup here; draft models and
EAGLE / MTP heads later behind the same interface — and their configuration. Not wired into the engine yet: the
exact verification (rejection sampler op, k + 1 query tokens per request, rollback in the scheduler) comes next."""
