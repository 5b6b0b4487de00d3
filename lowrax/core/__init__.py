"""The ground floor: what every other part of lowrax builds on, importing nothing above it."""
