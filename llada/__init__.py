"""The front door of llada-platform: the `llada` command, the demo, the console, and the cluster
manifests rendered from a recipe. It may import every other package; none imports it."""
