"""Networks: the client-side extractor E, the recogniser head, and reconstruction (shadow) networks."""
