"""Speculative decoding with the model's MTP heads: proposer (drafts), rejection (verify), stats."""
