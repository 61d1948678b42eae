"""Container profiles, the cgroup runner and the rendering of container files."""
