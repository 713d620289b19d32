"""The site's half of a federation: what a site does in a round (rounds), its data (data), its one
store of files (store), its folder rule (folders), its release cache (release), and its side of
secure aggregation (secagg, with its journal and registry). Every rule a site keeps lives here;
the ClientApp in ``clients/`` only translates Flower messages."""
