"""The sync agent: follows a store, validates, deploys into a model repository."""
