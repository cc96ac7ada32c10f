"""mifuse_ray."""
