"""Built-in adapters, one module per framework; each is imported only when its framework is used."""
