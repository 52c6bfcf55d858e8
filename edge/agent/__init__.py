"""The device agent: offline model store, local inference server, fleet connection.

The model store (:mod:`edge.agent.store`) is what the server and ``edge flash`` build on::

    store = Store(data_dir, profile, trust)      # recovers from any crash at open
    store.install(bundle_path, activate=True)    # -> InstalledModel (name, version, folder, manifest, key_id)
    store.activate(name, version) / store.rollback(name) / store.remove(name, version)
    store.active()                               # -> [InstalledModel], one per model name
    store.list()                                 # -> [ModelStatus] with per-version VersionStatus rows
    store.begin_load(name)                       # the version to load now, counting unconfirmed loads
    store.mark_healthy(name, version) / store.mark_unhealthy(name, version, reason)

Modules: :mod:`.store` (the API), :mod:`.install` and :mod:`.journal` (the install state
machine), :mod:`.recovery`, :mod:`.record` (``state.json``), :mod:`.versions` (a version on
disk), :mod:`.compatibility`, :mod:`.validate_child` (trial load in a child process),
:mod:`.device` (the store's profile), :mod:`.files` (durable file operations), :mod:`.faults`.
"""
