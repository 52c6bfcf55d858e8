"""The fleet controller: device registry, bundle repository, rollouts, desired state, REST API.

Everything the controller knows lives in its database (SQLite by default, PostgreSQL by URL),
so a restart loses nothing and resumes rollouts where they were.
"""
