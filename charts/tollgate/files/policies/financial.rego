# Money movement: amounts over the auto-approve threshold need a human; amounts over the hard
# cap are refused; an amount that is not a plain number is refused for financial tools.
# Applies to tools with risk.financial. Config: refund_auto_approve_max (default 500),
# refund_hard_cap (default 10000), amount_field (default "amount").
package tollgate

import rego.v1

fin_auto_max := object.get(data.tollgate_config, "refund_auto_approve_max", 500)

fin_hard_cap := object.get(data.tollgate_config, "refund_hard_cap", 10000)

fin_field := object.get(data.tollgate_config, "amount_field", "amount")

fin_raw := input.request.body[fin_field]

# Amounts arrive as numbers, or as strings from form bodies that did not look like plain
# integers ("1.2e3", "1200.00"). Both are compared as numbers.
fin_numeric_string(v) if {
	is_string(v)
	regex.match(`^-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?$`, v)
}

fin_amount := fin_raw if is_number(fin_raw)

fin_amount := to_number(fin_raw) if fin_numeric_string(fin_raw)

deny contains msg if {
	input.tool.risk.financial
	fin_raw
	not is_number(fin_raw)
	not fin_numeric_string(fin_raw)
	msg := sprintf("%v: %v must be a number, got %v", [input.tool.name, fin_field, fin_raw])
}

deny contains msg if {
	input.tool.risk.financial
	fin_amount < 0
	msg := sprintf("%v: negative %v %v", [input.tool.name, fin_field, fin_amount])
}

deny contains msg if {
	input.tool.risk.financial
	fin_amount > fin_hard_cap
	msg := sprintf("%v amount %v exceeds the hard cap %v", [input.tool.name, fin_amount, fin_hard_cap])
}

require_approval contains msg if {
	input.tool.risk.financial
	fin_amount > fin_auto_max
	fin_amount <= fin_hard_cap
	msg := sprintf("%v amount %v exceeds auto-approve threshold %v", [input.tool.name, fin_amount, fin_auto_max])
}
