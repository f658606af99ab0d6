"""One router per resource: predict, embeddings, models (/v1/models and /v1/adapters), health."""
