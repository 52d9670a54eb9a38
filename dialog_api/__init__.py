"""The dialog_api worker: stateless HTTP front of one shard database."""
