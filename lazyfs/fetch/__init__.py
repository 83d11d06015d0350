"""Getting chunk bytes: the persistent chunk cache, the fetch scheduler, blob sources and
background fill. Knows nothing of how layers are served (serve/) or of the daemon process
(daemon/); the home of fetch policies."""
