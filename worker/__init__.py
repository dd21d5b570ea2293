"""The Celery side of orgsync: the app factory, thin tasks and the plain functions they call."""
