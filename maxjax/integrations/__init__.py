"""Adapters to tools built around other runtimes; each imports its tool only when used (optional extras)."""
