"""Root of the test suite: fixtures live in tests/fixtures/, one plugin per role."""

pytest_plugins = [
    "fixtures.nbd_servers",
    "fixtures.guest",
]
