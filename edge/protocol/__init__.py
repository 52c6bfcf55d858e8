"""The contract between exporter, agent and fleet: profiles, manifests, bundles, topics."""
