"""Images as OCI defines them, and the tools that make, move and check them: names, manifests
and layouts, the registry client, buildx, the Docker engine, cosign, ELF closures, the compiler
cache."""
