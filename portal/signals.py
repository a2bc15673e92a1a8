"""What the portal tells the apps built on it, without importing them."""

from django.dispatch import Signal

# Sent once the tenant's status became suspended (keyword: tenant), after the change commits.
# inference cancels the tenant's jobs (inference/apps.py).
tenant_suspended = Signal()
