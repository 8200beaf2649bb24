package tollgate_test

import rego.v1

refund(amount) := {"tenant": {"id": "acme_co"}, "tool": {"name": "stripe.create_refund", "risk": {"financial": true, "reversible": false}, "labels": {}}, "request": {"method": "POST", "path": "/v1/refunds", "headers": {}, "query": {}, "body": {"amount": amount}}, "agent": {"name": "a", "labels": {}}}

test_small_refund_passes if {
	count(data.tollgate.require_approval) == 0 with input as refund(100)
	count(data.tollgate.deny) == 0 with input as refund(100)
}

test_threshold_asks_for_approval if {
	count(data.tollgate.require_approval) == 1 with input as refund(501)
}

test_string_amount_is_a_number if {
	count(data.tollgate.require_approval) == 1 with input as refund("501")
}

test_hard_cap_denies if {
	count(data.tollgate.deny) == 1 with input as refund(20000)
}

test_thresholds_come_from_config if {
	count(data.tollgate.require_approval) == 0 with input as refund(900) with data.tollgate_config as {"refund_auto_approve_max": 1000}
}
