"""Speculative decoding: proposers of draft tokens (n-gram prompt lookup; a draft model and EAGLE / MTP heads
later behind the same `propose` interface), their configuration, and the runner's `SpecDecodeProposer`.

The rest of the path lives where its concern does: the scheduler schedules a request's drafts after its decode
token and rolls back the rejected positions (`core/scheduler.py`), `InputBatch` puts them in the flat batch with
k + 1 scored positions, and `sample/rejection_sampler.py` verifies them exactly through the `rejection_sample` op."""
