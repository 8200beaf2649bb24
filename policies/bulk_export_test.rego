package tollgate_test

import rego.v1

listing(query) := {"tenant": {"id": "acme_co"}, "tool": {"name": "crm.list", "risk": {"financial": false, "reversible": true}, "labels": {}}, "request": {"method": "GET", "path": "/", "headers": {}, "query": query, "body": {}}, "agent": {"name": "a", "labels": {}}}

test_large_page_denied if {
	count(data.tollgate.deny) == 1 with input as listing({"page_size": "5000"})
}

test_limit_from_config if {
	count(data.tollgate.deny) == 0 with input as listing({"page_size": "5000"}) with data.tollgate_config as {"bulk_export_max": 10000}
}

test_small_page_allowed if {
	count(data.tollgate.deny) == 0 with input as listing({"per_page": 50})
}
