"""What runs inside the lab's real guest: its PID 1 script (``init``), the agent
(:mod:`.agent`) and the build-time closure probe (:mod:`.closure`)."""
