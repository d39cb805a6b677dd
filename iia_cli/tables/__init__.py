"""The result tables: tidy CSV rows, their identities and the methods x NFE tables printed from them."""
