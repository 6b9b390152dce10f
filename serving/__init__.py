"""rayfine serving: Ray Serve apps for exported model folders."""
