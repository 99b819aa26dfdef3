"""nn.Module building blocks of the models: linear, attention, norms, rotary, embeddings, logits, sampler."""
