"""The live dashboard page (issue 24 point 3), opened from the app's navigation and by the
TELEPHONY_ANALYTICS_MENU widget."""
