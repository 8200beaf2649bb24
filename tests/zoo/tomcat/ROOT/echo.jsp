<%@ page contentType="application/json; charset=UTF-8" pageEncoding="UTF-8" trimDirectiveWhitespaces="true" import="java.util.*" %><%!
  // Servlet echo: getParameter (query first, then a form body; first value), the path as the
  // container routed it (path parameters stripped, dot segments resolved: getPathInfo).
  static String q(String s) {
    if (s == null) return "null";
    StringBuilder b = new StringBuilder("\"");
    for (char c : s.toCharArray()) {
      if (c == '"' || c == '\\') b.append('\\').append(c);
      else if (c < 0x20) b.append(String.format("\\u%04x", (int) c));
      else b.append(c);
    }
    return b.append('"').toString();
  }
%><%
  StringBuilder f = new StringBuilder();
  for (Enumeration<String> e = request.getParameterNames(); e.hasMoreElements();) {
    String k = e.nextElement();
    if (f.length() > 0) f.append(',');
    f.append(q(k)).append(':').append(q(request.getParameter(k)));
  }
  StringBuilder h = new StringBuilder();
  String[] names = {"x-forwarded-host","x-forwarded-for","x-forwarded-proto","forwarded","x-original-url","x-http-method-override","content-type","content-encoding","stripe-account","idempotency-key"};
  for (String n : names) {
    String v = request.getHeader(n);
    if (v == null) continue;
    if (h.length() > 0) h.append(',');
    h.append(q(n)).append(':').append(q(v));
  }
  String path = request.getPathInfo() == null ? "/" : request.getPathInfo();
  out.print("{\"stack\":\"tomcat\",\"method\":" + q(request.getMethod()) + ",\"path\":" + q(path)
    + ",\"fields\":{" + f + "},\"headers\":{" + h + "}}");
%>
