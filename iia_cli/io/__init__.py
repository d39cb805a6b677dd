"""Files: atomic writes, output paths and their layout, sha256 of files, image quantisation and writers."""
