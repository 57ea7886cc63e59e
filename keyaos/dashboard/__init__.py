"""The operator's dashboard: figures aggregated from the ledger and charts drawn as inline SVG."""
