"""Sites as the engine sees them: the SiteAgent interface and its implementations."""
