# edgegw: package marker only.
