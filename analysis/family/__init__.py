"""The model family's sheets (068A, 068C, 068E): published numbers and findings."""
