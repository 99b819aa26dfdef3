"""Multi-LoRA serving: PEFT adapters read and checked (peft.py), LoRA-wrapped linear layers over stacked adapter
slots (layers.py), and the worker's adapter manager that fills the slots and the per-token slot map each step
(manager.py). `LoRARequest` (request.py) is what a request carries; it imports nothing heavy, so the engine core
may hold it."""
