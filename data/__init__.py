"""Data: corpus readers, the embedded demo corpus, features, vocabulary, storage, batching, scoring."""
