"""kubellm's inference engine."""
