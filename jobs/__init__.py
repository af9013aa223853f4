"""Ray jobs that index videos: listing, reading, decoding, embedding and writing, wired together."""
