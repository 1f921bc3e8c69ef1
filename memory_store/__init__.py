"""Rule and episode memory (Chroma), memory graph (networkx), router memory features."""
